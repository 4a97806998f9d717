/* Plain tables for Great Expectations Data Docs viewed offline (copied next to the docs by medvlm.data.data_docs).
 *
 * GX's pages build their index tables with bootstrap-table from a CDN, and no registry package ships
 * bootstrap-table. This file stands in for the part of it those pages call:
 *   $(table).bootstrapTable({columns, data, toolbar, search, sortName, sortOrder, rowStyle, rowAttributes})
 * renders every row (cells are GX's own HTML), sorts by sortName/sortOrder and by a click on a sortable header,
 * offers one search box over all columns, and triggers 'click-row.bs.table' (GX's row links) on a row click;
 * $(table).bootstrapTable('resetSearch') empties the search box.
 * Not provided: per-column filter controls ('clearFilterControl' has none to clear) and pagination (all rows show).
 */
(function ($) {
  'use strict';
  if (!$ || $.fn.bootstrapTable) {
    return;
  }

  function truthy(value) {
    return value === true || value === 'true';
  }

  function named(value) {  // GX passes callbacks by their global name
    if (typeof value === 'function') return value;
    if (typeof value === 'string' && typeof window[value] === 'function') return window[value];
    return null;
  }

  function plainText(html) {
    var div = document.createElement('div');
    div.innerHTML = html === undefined || html === null ? '' : String(html);
    return (div.textContent || '').replace(/\s+/g, ' ').trim();
  }

  function sortKey(row, column) {
    var value = row[column.sortName || column.field];
    return typeof value === 'number' ? value : plainText(value).toLowerCase();
  }

  function PlainTable($table, options) {
    this.$table = $table;
    this.options = options;
    this.columns = options.columns || [];
    this.data = (options.data || []).slice();
    this.query = '';
    this.order = options.sortOrder === 'desc' ? -1 : 1;
    this.sortColumn = null;
    for (var i = 0; i < this.columns.length; i++) {
      if (this.columns[i].field === options.sortName) this.sortColumn = this.columns[i];
    }
    $table.addClass('table table-bordered table-hover');
    this.buildToolbar();
    this.buildHeader();
    this.render();
  }

  PlainTable.prototype.buildToolbar = function () {
    var self = this;
    var $bar = $('<div class="d-flex justify-content-end align-items-center mb-2"></div>');
    if (this.options.toolbar) $(this.options.toolbar).appendTo($bar);
    if (truthy(this.options.search)) {
      this.$search = $('<input type="search" class="form-control form-control-sm ml-2" placeholder="Search">')
        .css('max-width', '16rem')
        .on('input', function () {
          self.query = String($(this).val()).trim().toLowerCase();
          self.render();
        })
        .appendTo($bar);
    }
    if ($bar.children().length) $bar.insertBefore(this.$table);
  };

  PlainTable.prototype.buildHeader = function () {
    var self = this;
    var $row = $('<tr></tr>');
    this.headers = [];
    this.columns.forEach(function (column) {
      var $th = $('<th></th>').css('text-align', column.align || '');
      var $label = $('<span></span>').text(column.title || column.field);
      var $arrow = $('<span class="ml-1"></span>');
      $th.append($label, $arrow);
      if (truthy(column.sortable)) {
        $th.css('cursor', 'pointer').attr('title', 'Sort').on('click', function () {
          self.order = self.sortColumn === column ? -self.order : 1;
          self.sortColumn = column;
          self.render();
        });
      }
      self.headers.push({column: column, $arrow: $arrow});
      $row.append($th);
    });
    this.$table.children('thead').remove();
    this.$table.prepend($('<thead></thead>').append($row));
  };

  PlainTable.prototype.render = function () {
    var self = this;
    var options = this.options;
    var rows = this.data.filter(function (row) {
      if (!self.query) return true;
      return self.columns.some(function (column) {
        return plainText(row[column.field]).toLowerCase().indexOf(self.query) >= 0;
      });
    });
    if (this.sortColumn) {
      var column = this.sortColumn;
      rows.sort(function (a, b) {
        var x = sortKey(a, column), y = sortKey(b, column);
        return (x < y ? -1 : x > y ? 1 : 0) * self.order;
      });
    }
    this.headers.forEach(function (header) {
      header.$arrow.text(header.column === self.sortColumn ? (self.order > 0 ? '\u25B2' : '\u25BC') : '');
    });
    var rowStyle = named(options.rowStyle);
    var rowAttributes = named(options.rowAttributes);
    var $body = $('<tbody></tbody>');
    rows.forEach(function (row, index) {
      var $tr = $('<tr></tr>');
      var style = rowStyle ? rowStyle(row, index) || {} : {};
      if (style.css) $tr.css(style.css);
      if (style.classes) $tr.addClass(style.classes);
      $.each(rowAttributes ? rowAttributes(row, index) || {} : {}, function (name, value) {
        if (name === 'class') $tr.addClass(value);
        else $tr.attr(name, value);
      });
      self.columns.forEach(function (column) {
        var value = row[column.field];
        $('<td></td>').css('text-align', column.align || '')
          .html(value === undefined || value === null ? '' : String(value)).appendTo($tr);
      });
      $tr.on('click', function (event) {
        if ($(event.target).closest('a').length) return;  // a link inside the row opens itself
        self.$table.trigger($.Event('click-row.bs.table'), [row, $tr]);
      });
      $body.append($tr);
    });
    if (!rows.length) {
      $body.append($('<tr></tr>').append(
        $('<td class="text-center text-muted"></td>').attr('colspan', this.columns.length || 1)
          .text('No matching records')));
    }
    this.$table.children('tbody').remove();
    this.$table.append($body);
  };

  PlainTable.prototype.resetSearch = function () {
    if (this.$search) this.$search.val('');
    this.query = '';
    this.render();
  };

  $.fn.bootstrapTable = function (option) {
    return this.each(function () {
      var $table = $(this);
      var table = $table.data('medvlm.plainTable');
      if (typeof option === 'string') {
        if (table && option === 'resetSearch') table.resetSearch();
        return;  // other methods act on features this fallback does not draw
      }
      // a table GX wrote out in full (data-toggle="table", no columns given) keeps its own HTML
      if (!table && option && option.columns) $table.data('medvlm.plainTable', new PlainTable($table, option));
    });
  };
})(window.jQuery);
